<?php
// PHPMailer (Debian's libphp-phpmailer) sending one message, as a PHP app does:
// php phpmailer.php HOST PORT SECURE USER PASSWORD SENDER SUBJECT
// SECURE is "" (plain), "tls" (STARTTLS) or "ssl" (TLS from the start); an empty USER
// sends without AUTH. Prints "sent" or "refused: <PHPMailer's error>".
require '/usr/share/php/libphp-phpmailer/autoload.php';
use PHPMailer\PHPMailer\PHPMailer;
[$_, $host, $port, $secure, $user, $password, $sender, $subject] = $argv;
$mail = new PHPMailer(true);
$mail->isSMTP();
$mail->Host = $host;
$mail->Port = (int)$port;
$mail->SMTPAuth = $user !== '';
$mail->Username = $user;
$mail->Password = $password;
$mail->SMTPSecure = $secure;
$mail->SMTPAutoTLS = $secure !== '';
// The tests' certificate is their own: PHPMailer is told not to verify it.
$mail->SMTPOptions = ['ssl' => ['verify_peer' => false, 'verify_peer_name' => false,
                                'allow_self_signed' => true]];
$mail->setFrom($sender);
$mail->addAddress('x1@rcpt.test');
$mail->Subject = $subject;
$mail->Body = "hello from PHPMailer";
try {
    $mail->send();
    echo "sent\n";
} catch (Exception $e) {
    echo "refused: ", $mail->ErrorInfo, "\n";
}
